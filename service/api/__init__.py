"""The gRPC edge: listeners, the error boundary, reflection, request validation, one servicer per service.

The only package that imports grpc. A servicer validates its request, has the
call admitted, and hands it to the package that owns the work.
"""
