"""The gRPC gateway: validates and tokenizes requests, streams results, exports metrics.

It runs in its own process and talks to the coordinator actor through Ray; it never touches tensors.
"""
