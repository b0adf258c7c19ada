from b2kernels.info import main

main()
