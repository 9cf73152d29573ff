"""Counter-based randomness that is the same on every device and in every batch layout.

A sample's random numbers depend only on its 64-bit sample seed (derived from
``(seed, key, epoch)`` with BLAKE2b) and on a *draw* name, never on its position in
the batch, the batch size or the device:

* per-sample scalars (angles, chain order, ...) come from a NumPy ``Generator`` seeded
  with a BLAKE2b digest of ``(sample seed, draw)``; they are cheap and made on the CPU;
* per-pixel fields (noise, rain drops, depth fields) come from a hash of
  ``(per-sample keys, element index)`` computed with int32 tensor ops on the batch's
  device: xor, logical shifts (arithmetic shift plus a mask) and multiplication that
  wraps modulo 2**32, which is what CPU vector units and CUDA both do. CPU and CUDA
  therefore give bit-identical integers; the only device difference left is the float
  rounding of ``log``/``sqrt``/``cos`` in Box-Muller (a few ULP).
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "derived_seed", "SampleRNG"]

# lowbias32 multipliers (C. Wellons' hash prospector), as signed int32.
_MUL_A = 0x7FEB352D
_MUL_B = 0x846CA68B - (1 << 32)
# Elements hashed per step on the CPU: the intermediates of one piece stay in cache.
_CPU_CHUNK = 1 << 17


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _digest(*parts: object) -> bytes:
    text = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=16).digest()


def sample_seed(seed: int, key: object, epoch: int) -> int:
    """The 64-bit seed of one sample: a stable hash of ``(seed, key, epoch)``."""
    return struct.unpack("<Q", _digest("sample", seed, key, epoch)[:8])[0]


def derived_seed(seed: int, *names: object) -> int:
    """A 64-bit seed for one part of a sample's work (e.g. step 2 of a chain)."""
    return struct.unpack("<Q", _digest("derived", seed, *names)[:8])[0]


def _xorshift_(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x ^= x >>> shift on int32 (logical shift: arithmetic shift, then mask)."""
    return x.bitwise_xor_((x >> shift).bitwise_and_((1 << (32 - shift)) - 1))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash on int32 tensors, in place."""
    _xorshift_(x, 16).mul_(_MUL_A)
    _xorshift_(x, 15).mul_(_MUL_B)
    return _xorshift_(x, 16)


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
        """Per-sample (xor key, odd multiplier) pairs, shape (B, 2), int32 on the device."""
        rows = []
        for s in self.seeds:
            xor_key, mul_key = struct.unpack("<2I", _digest("field", s, draw)[:8])
            rows.append((_signed32(xor_key), _signed32(mul_key | 1)))
        return torch.tensor(rows, dtype=torch.int32).to(self.device)

    def _chunk(self, n: int) -> int:
        """Elements per step: all at once on accelerators, cache-sized pieces on the CPU."""
        if self.device.type != "cpu":
            return max(1, n)
        return max(1, _CPU_CHUNK // max(1, len(self.seeds)))

    @staticmethod
    def _hash(counters: torch.Tensor, xor_key: torch.Tensor, mul_key: torch.Tensor) -> torch.Tensor:
        """A per-sample permutation of the counters (xor, odd multiply mod 2**32), then an
        avalanching mix: (B, n) int32 holding 32 random bits."""
        return _mix32((counters ^ xor_key).mul_(mul_key))

    def bits(self, n: int, draw: str) -> torch.Tensor:
        """(B, n) int32 hashes (32 random bits) of element indices 0..n-1 of each sample."""
        keys = self._keys(draw)
        xor_key, mul_key = keys[:, :1], keys[:, 1:]
        out = torch.empty((len(self.seeds), n), dtype=torch.int32, device=self.device)
        step = self._chunk(n)
        for start in range(0, n, step):
            stop = min(n, start + step)
            counters = torch.arange(start, stop, dtype=torch.int32, device=self.device)
            out[:, start:stop] = self._hash(counters, xor_key, mul_key)
        return out

    @staticmethod
    def _to_unit(bits: torch.Tensor) -> torch.Tensor:
        """The top 24 bits as float32 in the open interval (0, 1)."""
        return ((bits >> 8).bitwise_and_(0xFFFFFF).float() + 0.5).mul_(1.0 / (1 << 24))

    def uniform(self, shape: Sequence[int], draw: str) -> torch.Tensor:
        """(B, *shape) float32 uniforms in the open interval (0, 1)."""
        return self._to_unit(self.bits(math.prod(shape), draw)).view(len(self.seeds), *shape)

    def normal(self, shape: Sequence[int], draw: str) -> torch.Tensor:
        """(B, *shape) float32 standard normals.

        Box-Muller on pairs: pair p uses the uniforms of counters 2p and 2p + 1 and gives
        element p (cosine) and element P + p (sine), P = ceil(n / 2). Worked through in
        cache-sized pieces so that the hash, the logs and the cosines stay in cache.
        """
        n = math.prod(shape)
        pairs = (n + 1) // 2
        keys = self._keys(draw)
        xor_key, mul_key = keys[:, :1], keys[:, 1:]
        out = torch.empty((len(self.seeds), 2 * pairs), dtype=torch.float32, device=self.device)
        step = max(1, self._chunk(2 * pairs) // 2)
        for start in range(0, pairs, step):
            stop = min(pairs, start + step)
            counters = torch.arange(2 * start, 2 * stop, dtype=torch.int32, device=self.device)
            u = self._to_unit(self._hash(counters, xor_key, mul_key)).view(len(self.seeds), -1, 2)
            radius = u[..., 0].log().mul_(-2.0).sqrt_()
            angle = u[..., 1].mul(2.0 * math.pi)
            torch.mul(radius, torch.cos(angle), out=out[:, start:stop])
            torch.mul(radius, angle.sin_(), out=out[:, pairs + start : pairs + stop])
        if 2 * pairs != n:
            out = out[:, :n]
        return out.reshape(len(self.seeds), *shape)
