from llmpress.cli import main

main()
