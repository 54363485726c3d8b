"""`adapterd trainer`: the side-service that fine-tunes adapters and uploads them to the server.

jobs (a persisted queue; one job at a time, each in a worker subprocess) -> worker (validate the data,
evaluate the base model, train, evaluate the adapter) -> register (upload through the server's public API).
The HTTP and gRPC front ends (http.py, grpc.py) only talk to `JobService`.
"""
