"""Top floor: jobs, engine adapters (Beam, Ray), the CLI."""
