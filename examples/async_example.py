"""The complete example with asyncio: 50 concurrent coroutines through one @stable function.

Keys come from OPENAI_API_KEYS (comma-separated); OPENAI_BASE_URL may point at the local
simulator (``python -m stable_openai simulate ...``, see complete_example.py).
"""

from __future__ import annotations

import asyncio
import os

import openai

from stable_openai import KeyManager, stable

KeyManager(os.environ["OPENAI_API_KEYS"].split(","))
clients: dict[str, openai.AsyncOpenAI] = {}


@stable
async def ask(prompt: str, api_key: str) -> str:
    # One client per key, reused: one connection pool per key. max_retries=0 leaves
    # retrying to @stable, which moves to another key instead of retrying the same one.
    client = clients.get(api_key)
    if client is None:
        client = clients[api_key] = openai.AsyncOpenAI(api_key=api_key, max_retries=0)
    response = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
    )
    return response.choices[0].message.content or ""


@stable
async def stream(prompt: str, api_key: str):  # an async generator: streamed answers
    client = openai.AsyncOpenAI(api_key=api_key, max_retries=0)
    chunks = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
    )
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content
    await client.close()


async def main() -> None:
    answers = await asyncio.gather(*(ask(f"Coroutine {i}: Hello, world!") for i in range(50)))
    for index, answer in enumerate(answers):
        print(f"Coroutine {index}: {answer}")
    print("Streamed:", "".join([part async for part in stream("Stream: Hello, world!")]))
    for client in clients.values():
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
