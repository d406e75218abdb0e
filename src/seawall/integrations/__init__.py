"""Optional integrations, each importing its third-party package lazily.

Import the submodule you need (``seawall.integrations.asyncpg``, ``.httpx``,
``.fastapi``, ``.aiobreaker``); importing ``seawall`` alone pulls none of them.
"""
