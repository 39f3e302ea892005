from fastpath.cli import main

raise SystemExit(main())
