"""The original stable-openai README's "complete example", unchanged but for where the keys
come from: 10 threads × 5 calls through one @stable function.

Run it against the local simulator (no real key needed):

    python -m stable_openai simulate --window 1 --rpm 10 --port 8765 \
        --key sk-example-good-0000000000000001:alpha \
        --key sk-example-good-0000000000000002:beta \
        --key sk-example-revoked-00000000000003:gamma:revoked &
    export OPENAI_BASE_URL=http://127.0.0.1:8765/v1
    export OPENAI_API_KEYS=sk-example-good-0000000000000001,sk-example-good-0000000000000002
    export OPENAI_API_KEYS=$OPENAI_API_KEYS,sk-example-revoked-00000000000003
    python examples/complete_example.py

or against OpenAI with your own keys in OPENAI_API_KEYS (comma-separated).
"""

import os
import threading

import openai

from stable_openai import KeyManager, stable

# Initialize KeyManager and add API keys
api_keys = os.environ["OPENAI_API_KEYS"].split(",")  # Replace with your list of API keys
KeyManager(api_keys)


@stable
def completions_with_backoff(model, messages, api_key):
    # Create a client using the specified API key
    client = openai.OpenAI(api_key=api_key)

    # Send a request to the OpenAI API and return the response
    response = client.chat.completions.create(
            model=model,
            messages=messages
    )
    return response.choices[0].message.content


# Define a function for multi-threaded execution
def thread_function(thread_id):
    for i in range(5):  # Assuming each thread runs 5 times
        try:
            # Generate a test prompt
            test_prompt = f"Thread {thread_id}, Test {i + 1}: Hello, world!"
            messages = [{"role": "user", "content": test_prompt}]

            # Call the API
            response = completions_with_backoff(
                    model="gpt-3.5-turbo",
                    messages=messages,
            )
            print(f"Thread {thread_id}, Request {i + 1}/5: Success, Response: {response}")
        except Exception as e:
            print(f"Thread {thread_id}, Request {i + 1}/5: Failed, Error: {e}")


# Create and start threads
threads = []
for i in range(10):  # Assuming 10 threads are started
    t = threading.Thread(target=thread_function, args=(i + 1,))
    threads.append(t)
    t.start()

# Wait for all threads to complete
for t in threads:
    t.join()
