"""fakekube: a fake Kubernetes API server (pods only) for integration tests."""

from .client import DEFAULT_TOKEN, FakeKube, FakeKubeError, free_port, make_pod, write_kubeconfig

__all__ = ["DEFAULT_TOKEN", "FakeKube", "FakeKubeError", "free_port", "make_pod", "write_kubeconfig"]
