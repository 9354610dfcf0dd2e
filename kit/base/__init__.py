"""Model bases: family layout, building from parts, the embedded mini base, loading, memory estimate."""
