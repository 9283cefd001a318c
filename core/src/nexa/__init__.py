"""nexa: a local server for AI models that speaks the OpenAI HTTP API.

The core owns the hooks (``nexa.hookspecs``), value types (``nexa.types``), backend
contract (``nexa.backend``), model store (``nexa.store``, ``nexa.hub``), the HTTP server
(``nexa.server``) and the CLI (``nexa.cli``). Backends live in separate plugins.
"""

__version__ = "0.1.0"
