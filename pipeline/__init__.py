"""Ray Data plan and storage I/O for batch LVLM inference; no torch at module level."""
