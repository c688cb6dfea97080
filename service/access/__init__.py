"""Who may call and what they may see: credentials, consent tokens, extraction limits, the partner gate."""
