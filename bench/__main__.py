"""`python -m bench`: the end-to-end STS training demo; `python -m bench --scheme`: the two-stage
scheme (bench/scheme.py); `python -m bench --ops`: op benchmarks."""

import importlib.util
import sys

if "--ops" in sys.argv[1:]:
    if importlib.util.find_spec("bench.ops") is None:
        sys.exit("bench/ops.py is not there yet")
    from .ops import main as ops_main

    sys.argv.remove("--ops")
    ops_main()
elif "--scheme" in sys.argv[1:]:
    from .scheme import main as scheme_main

    scheme_main()
else:
    from .demo import main

    main()
