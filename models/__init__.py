"""All model I/O: packaged offline models, local transformers backends, remote endpoints.

Nothing is imported here on purpose: `import models.packaged` must not pull in torch, and the
cascade core must be usable without any of this.
"""
