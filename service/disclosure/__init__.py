"""What leaves and its record: views, pseudonyms, page tokens, the reads, the ledger record, the breach report."""
