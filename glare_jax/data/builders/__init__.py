"""data/builders."""
