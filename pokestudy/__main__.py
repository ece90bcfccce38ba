from pokestudy.cli import main

raise SystemExit(main())
