"""The FIX drop-copy gateway: FIX sessions in, one exposure session out (docs/fix.md)."""
