"""Test helpers shared by the end-to-end and hardening tests."""

from __future__ import annotations

import openai


class AsyncClients:
    """One ``openai.AsyncOpenAI`` per key, for one event loop; ``aclose`` inside that loop."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def get(self, api_key: str) -> openai.AsyncOpenAI:
        client = self._clients.get(api_key)
        if client is None:
            client = openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0)
            self._clients[api_key] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
