# Siteward node firmware (MicroPython).
