from steerable.cli import main

raise SystemExit(main())
