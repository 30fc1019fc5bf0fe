"""Models as Ray Serve deployments, shared by stages, runs and people.

`apps.py` turns `models:` entries into Serve applications (vLLM through Ray Serve LLM; transformers
and SAM models as plain deployments from `servers.py`) and starts, finds and stops them.
`client.py` is what a chain worker uses to call one: async, bounded in flight, one request per
region, retried across replica replacement. `routing.py` keeps an image's regions on one replica.
Nothing here knows prompts or stages.
"""
