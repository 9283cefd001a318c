"""nexa-ray: the Ray engine for nexa (``nexa serve --engine ray``).

Each model runs as N replicas, named detached Ray actors spread over a Ray cluster, each
loading the model through the same backend plugin it would use in-process. The server
keeps its HTTP API; a stand-in backend (``nexa_ray.proxy.RayBackend``) routes each
request to the least-loaded healthy replica. Importing this package does not import Ray:
only ``--engine ray`` does.
"""

__version__ = "0.1.0"
