from gce.cli import main

raise SystemExit(main())
