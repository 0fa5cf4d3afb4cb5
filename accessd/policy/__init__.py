"""Who is calling (auth), what they may touch (entitlements)."""
