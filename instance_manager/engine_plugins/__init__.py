"""Code that vLLM loads inside its own processes (scheduler classes and the like).

Keep this package import-light: vLLM imports these modules in the engine process, which
has vLLM but not necessarily the gateway's dependencies. Nothing here may import
`router`, `fastapi`, `httpx` or other gateway-side packages, and this `__init__` imports
nothing at all.
"""
