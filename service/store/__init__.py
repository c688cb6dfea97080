"""Everything that touches PostgreSQL. Only this package imports asyncpg; it never imports grpc."""
