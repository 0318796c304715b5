# Version of the application files: what file-bundle OTA compares. Builds with OTA
# partitions report the app description version of the running image instead.
PROJECT = "siteward-node"
VERSION = "1.0.0"
