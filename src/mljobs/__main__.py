from mljobs.cli import main

main()
