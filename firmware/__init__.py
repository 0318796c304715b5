"""ESP32 side: node firmware and the host tools to check, sign, flash and provision (see issue 7)."""
