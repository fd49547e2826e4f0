from psctl.cli import main

raise SystemExit(main())
