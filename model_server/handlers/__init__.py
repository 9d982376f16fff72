"""HTTP handlers: parse and check JSON, queue the work, format the OpenAI-style answer.

Handlers never touch tensors; they pass records from ``model_server.schemas`` to the task
runners on the device threads and build the response from what comes back.
"""
