"""Building blocks shared by backends: root filesystems (and, later, disk images)."""
