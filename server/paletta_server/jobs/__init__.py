"""Jobs: persisted store, pure scheduler, event hub and the device worker."""
