"""``python -m simpletuner_dmd.docs --write docs/config.md`` (or ``--check``): the key tables of ``docs/config.md``,
generated from the schemas. An entry point, like ``cli.py``: the code is the reference host's
(``hosts/reference/key_tables.py``), since the tables document its config file; the names stay importable from here.
"""

import sys

from .hosts.reference.key_tables import (  # noqa: F401
    BEGIN,
    COMMAND,
    END,
    check_readme,
    format_default,
    format_type,
    key_table,
    main,
    readme_tables,
    replace_block,
    write_readme,
)

if __name__ == "__main__":
    sys.exit(main())
