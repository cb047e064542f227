"""Sources: local files, the byte-range readers, object storage on loopback servers
(fixtures ``range_server`` and ``moto_s3`` from the root conftest) and the disk cache."""
