from amct_caffe.cli import main
import sys
sys.exit(main())
