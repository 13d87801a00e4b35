"""The soak test's pieces: backend process, route configs, clients, ledger, report."""
