from stabcheck.cli import main

main()
