"""The audit ledger: what was asked, what was decided, what was issued. See events.py and store.py."""
