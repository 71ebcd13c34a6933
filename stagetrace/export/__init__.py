"""Exporters: each reads records (and their spans) and writes one format; none depends on another."""
