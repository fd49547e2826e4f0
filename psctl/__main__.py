from shardps.psctl.cli import main

raise SystemExit(main())
