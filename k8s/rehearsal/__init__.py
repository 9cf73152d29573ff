"""The deployment of k8s/ run on one machine as Kubernetes and KubeRay would run it (see k8s/rehearse.py)."""
