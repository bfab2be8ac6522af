"""What is saved: the SQLite ledger, the budget over it, and rented-instance rows."""
