"""What every layer uses: atomic files and readers (io), configuration (config), preference pairs
and their files (pairs), statistics (stats), processes (distributed, parallel, interrupts) and the one
checkpoint format (checkpoint). Imports nothing else from the package."""
