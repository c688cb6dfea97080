"""The demo ``make run`` serves: fictitious data, a partner key, and a grpcurl walk-through.

Outside the service package: it uses the service as any tool would, and the
service's command line imports it only for ``python -m service demo``.
"""
