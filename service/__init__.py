"""apptgate: a gRPC gateway giving partner software minimal-disclosure views of appointments."""
