from visiontune.cli import main

main()
