"""What every stage shares: settings, logging, atomic files, the state folder's owner."""
