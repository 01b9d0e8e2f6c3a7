"""The OpenAI-compatible HTTP API of the gateway: the only code here touching HTTP and JSON.

``protocol`` (the wire shapes), ``convert`` (to the gateway's domain types), ``serving`` (one
request over :class:`~gateway.generation.GenerationCore`, streamed or not), ``errors`` (the one
status table), ``app`` (routes) and ``http_server`` (uvicorn in the gateway's loop).
"""
