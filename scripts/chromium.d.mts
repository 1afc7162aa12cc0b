export declare const CHROMIUM: string;
export declare const CHROMIUM_ARGS: string[];
export declare const launchOptions: { executablePath: string; headless: boolean; args: string[] };
