"""Counter-based randomness that is the same on every device and in every batch layout.

A sample's random numbers depend only on its 64-bit sample seed (derived from
``(seed, key, epoch)`` with BLAKE2b) and on a *draw* name, never on its position in
the batch, the batch size or the device:

* per-sample scalars (angles, chain order, ...) come from a NumPy ``Generator`` seeded
  with a BLAKE2b digest of ``(sample seed, draw)``; they are cheap and made on the CPU;
* per-pixel fields (noise, rain drops, depth fields) come from a hash of
  ``(per-sample keys, element index)`` computed with int64 tensor ops on the batch's
  device. Every intermediate stays below 2**63 (32-bit values times 31-bit odd
  constants), so no op overflows and CPU and CUDA give bit-identical integers; the
  only device difference left is the float rounding of ``log``/``sqrt``/``cos`` in
  Box-Muller (a few ULP).
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "derived_seed", "SampleRNG"]

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one of them stays below 2**63.
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D
# Elements hashed per step on the CPU: a few MiB of int64 stays in cache between ops.
_CPU_CHUNK = 1 << 17


def _digest(*parts: object) -> bytes:
    text = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=16).digest()


def sample_seed(seed: int, key: object, epoch: int) -> int:
    """The 64-bit seed of one sample: a stable hash of ``(seed, key, epoch)``."""
    return struct.unpack("<Q", _digest("sample", seed, key, epoch)[:8])[0]


def derived_seed(seed: int, *names: object) -> int:
    """A 64-bit seed for one part of a sample's work (e.g. step 2 of a chain)."""
    return struct.unpack("<Q", _digest("derived", seed, *names)[:8])[0]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanching 32-bit integer hash on int64 tensors (in place, values < 2**32)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MUL_A).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL_B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return x


class SampleRNG:
    """Random numbers for a batch of samples, each from its own seed.

    ``draw`` names the independent fields one degradation needs ("noise", "drops").
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.seeds)

    def subset(self, index: Sequence[int]) -> "SampleRNG":
        return SampleRNG([self.seeds[i] for i in index], self.device)

    def numpy(self, i: int, draw: str) -> np.random.Generator:
        """A CPU generator for per-sample scalars of sample ``i``."""
        words = struct.unpack("<4I", _digest("numpy", self.seeds[i], draw))
        return np.random.Generator(np.random.PCG64(list(words)))

    def _keys(self, draw: str) -> torch.Tensor:
        """Per-sample (xor key, odd multiplier) pairs, shape (B, 2), int64 on the device."""
        rows = []
        for s in self.seeds:
            xor_key, mul_key = struct.unpack("<2I", _digest("field", s, draw)[:8])
            rows.append((xor_key, (mul_key & 0x7FFFFFFF) | 1))
        return torch.tensor(rows, dtype=torch.int64).to(self.device)

    def bits(self, n: int, draw: str) -> torch.Tensor:
        """(B, n) int64 hash values in [0, 2**32) for element indices 0..n-1 of each sample."""
        keys = self._keys(draw)
        xor_key, mul_key = keys[:, :1], keys[:, 1:]
        out = torch.empty((len(self.seeds), n), dtype=torch.int64, device=self.device)
        chunk = n if self.device.type != "cpu" else max(1, _CPU_CHUNK // max(1, len(self.seeds)))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            x = torch.arange(start, stop, dtype=torch.int64, device=self.device).expand(len(self.seeds), -1)
            # A per-sample permutation of the counters, then two hash rounds.
            x = (x ^ xor_key).mul_(mul_key).bitwise_and_(_M32)
            x = _mix32(_mix32(x).bitwise_xor_(xor_key))
            out[:, start:stop] = x
        return out

    def uniform(self, shape: Sequence[int], draw: str) -> torch.Tensor:
        """(B, *shape) float32 uniforms in the open interval (0, 1)."""
        n = math.prod(shape)
        u = ((self.bits(n, draw) >> 8).float() + 0.5) * (1.0 / (1 << 24))
        return u.view(len(self.seeds), *shape)

    def normal(self, shape: Sequence[int], draw: str) -> torch.Tensor:
        """(B, *shape) float32 standard normals (Box-Muller on two halves of the uniforms)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform((2 * half,), draw)
        radius = torch.log(u[:, :half]).mul_(-2.0).sqrt_()
        angle = u[:, half:].mul(2.0 * math.pi)
        z = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
        return z[:, :n].reshape(len(self.seeds), *shape)
